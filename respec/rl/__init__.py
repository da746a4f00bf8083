"""RL math (GRPO advantages, the decoupled PPO objective), free of any runtime."""
