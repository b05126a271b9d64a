"""What the tools and the tests build, not the loop: the tiny models of the quickstart, the tests and the
benchmarks (tiny: the chatterbot corpus, a tokenizer trained on it, random weights of a supported
architecture), the shipped tool-use set (toolset) and the long agent trajectories over this repository
(trajectories). Nothing under loop/ imports these.
"""
