"""The process a run sits on, below the stages: which device it trains on (``device``), the
decisions processes take together under torchrun (``ranks``), the speed recipe for this machine
(``recipe``), SIGTERM turned into a stop with one deadline (``preemption``) and forked
preprocessing workers (``parallel``). They import nothing of the job's but the exit codes.
"""
