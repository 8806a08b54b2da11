"""Where things are, for tests in any tier: the repository root, its experiments/ and tests/."""
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
EXPERIMENTS = os.path.join(REPO, "experiments")
