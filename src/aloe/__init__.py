"""aloe: train and measure LLMs that infer a user's preferences over a conversation.

The package is the library behind the ordered notebooks in ``notebooks/``; every
notebook cell is one call into it. See README.md for the two commands.
"""

__version__ = "0.1.0"
