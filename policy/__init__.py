"""The language model being aligned: pretraining, SFT with PEFT, sampling, DPO, PPO, RLOO/GRPO, evaluation."""
