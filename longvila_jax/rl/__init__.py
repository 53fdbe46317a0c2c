"""Reinforcement learning on long videos: GRPO with rollouts from one prefilled prompt."""
