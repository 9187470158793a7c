"""The log-prob engine: completion-only chunked log-probs (``logprobs``), the attention masks of each batch
layout (``attention``), selective recomputation (``recompute``) and the startup probe (``probe``).
"""
