"""Hand-made eval prompt rows for the labeler world's tests: only the fields a test names differ
from an unconstrained prompt whose reference answer is ``reference``."""
from rlhf_jax.world import render_prompt


def prompt_row(kind, instruction, reference, hostile=False, **fields):
    meta = {"type": kind, "hostile": hostile, "instruction": instruction, "entity": None,
            "attribute": None, "value": None, "answer": None, "items": [], "constraint": None,
            "max_words": None, "reference": reference, "reference_terse": reference,
            "budget": len(reference.split()) + 1, "target_facts": 0, **fields}
    return {"prompt": render_prompt(instruction), "meta": meta}
