"""Floor policies: fixed rules that read only the prompt's type, judged beside the trained models.

A model that the labelers prefer to SFT has learned something only if it also beats what a rule
with no knowledge of the world gets: an audit found PPO winning by answering "no ." to a third of
the prompts and a policy that always abstains matching PPO-ptx. Each floor maps a prompt's
``meta`` to a response:

* ``abstain``           always "i do not know ." (honest, never false, breaks no constraint);
* ``always_no``         always "no ." (right on half the yes/no prompts, off task elsewhere);
* ``abstain_no_sorry``  "no ." to yes/no questions, "sorry ." to rude requests, "i do not
                        know ." to everything else: the cheap exploits an earlier scorer paid
                        for (a bare "sorry ." names no animal, so it now refuses nothing).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

ABSTAIN = "i do not know ."
NO = "no ."
SORRY = "sorry ."


def _abstain_no_sorry(meta: Mapping) -> str:
    if meta["type"] == "yes_no":
        return NO
    if meta["type"] == "rude_request":
        return SORRY
    return ABSTAIN


FLOORS: dict[str, Callable[[Mapping], str]] = {
    "abstain": lambda meta: ABSTAIN,
    "always_no": lambda meta: NO,
    "abstain_no_sorry": _abstain_no_sorry,
}


def floor_responses(name: str, prompt_rows: Sequence[Mapping]) -> list[str]:
    """Floor ``name``'s response to each prompt row (rows carry the world's ``meta``)."""
    if name not in FLOORS:
        raise KeyError(f"unknown floor {name!r}; expected one of {sorted(FLOORS)}")
    return [FLOORS[name](row["meta"]) for row in prompt_rows]
