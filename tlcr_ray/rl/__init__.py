"""Reinforcement learning on token-level rewards: the batch layout (`batch`), token rewards (`rewards`),
PPO math (`ppo_math`), the learner rank (`learner`), the controller's pure pieces (`loop_state`),
weight sync, and the rollout backends (`rollout/`)."""
