"""Rule-based rewards for GRPO (DeepSeek-R1 section 2.2.2): `reward(prompt, completion, **example) -> float`,
never raising."""

from r1forge.rl.rewards.accuracy import accuracy_reward, answers_match, make_accuracy_reward
from r1forge.rl.rewards.answers import extract_answer, extract_boxed, normalize_answer, parse_number
from r1forge.rl.rewards.checker import MathChecker, default_checker
from r1forge.data.tags import prompt_opens_think
from r1forge.rl.rewards.format_rewards import (format_reward, format_reward_soft, language_consistency_reward,
                                               overlong_penalty)
from r1forge.rl.rewards.registry import (REWARD_FUNCTIONS, CombinedReward, combine_rewards, get_reward, load_reward,
                                         register_reward)
from r1forge.rl.rewards.stats import REWARD_STATS, RewardFunction, RewardStats

__all__ = [
    "accuracy_reward", "answers_match", "make_accuracy_reward", "extract_answer", "extract_boxed",
    "normalize_answer", "parse_number", "MathChecker", "default_checker", "format_reward", "format_reward_soft",
    "language_consistency_reward", "overlong_penalty", "prompt_opens_think", "REWARD_FUNCTIONS", "CombinedReward",
    "combine_rewards", "get_reward", "load_reward", "register_reward", "REWARD_STATS", "RewardFunction",
    "RewardStats",
]
