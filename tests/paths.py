"""Where things are, for tests in any tier: the repository root, its experiments/ and tests/,
and a free loopback port for the tests that start servers or multi-process jobs."""
import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
EXPERIMENTS = os.path.join(REPO, "experiments")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for a coordinator, an emulator)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
