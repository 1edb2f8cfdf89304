"""RLHF on the core model: the instruction world, reward model, policy losses (REINFORCE, PPO, GRPO,
DPO), the judge, the demo pipeline. Imports core only."""
