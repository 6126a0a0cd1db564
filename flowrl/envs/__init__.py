"""Environments for multi-turn agentic rollouts: the interface, a code sandbox and the tools a model calls."""

from flowrl.envs.base import ENVIRONMENTS, Environment, StepResult, env_class, make_env, register_env

__all__ = ["ENVIRONMENTS", "Environment", "StepResult", "env_class", "make_env", "register_env"]
