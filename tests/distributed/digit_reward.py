"""A reward a random tiny policy climbs in a few GRPO steps (measured): the share of its characters that are digits."""


def digit_share(prompt: str, completion: str, **example: object) -> float:
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)
