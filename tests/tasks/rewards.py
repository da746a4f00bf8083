"""A user reward function, loaded by import path in the tests."""


def length_reward(response: str, answer: str, prompt: str) -> float:
    return float(len(response))


def moody_reward(response: str, answer: str, prompt: str) -> float:
    """Raises on 'boom', never returns on 'hang', else checks the answer."""
    if "boom" in response:
        raise RuntimeError("the checker broke")
    while "hang" in response:
        pass
    return 1.0 if response.endswith(f"A:{answer}") else 0.0
