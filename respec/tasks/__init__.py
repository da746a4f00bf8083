"""Verifiable-reward tasks: prompt generators and checkers (built-in, datasets, user functions)."""

from respec.tasks.base import CheckResult, Problem, Task
from respec.tasks.registry import make_task

__all__ = ["CheckResult", "Problem", "Task", "make_task"]
