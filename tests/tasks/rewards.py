"""A user reward function, loaded by import path in the tests."""


def length_reward(response: str, answer: str, prompt: str) -> float:
    return float(len(response))
