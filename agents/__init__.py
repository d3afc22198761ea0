"""Our own RL agents built on rl_kfac: networks, rollout collection, ACKTR, PPO-KFAC, logging."""
