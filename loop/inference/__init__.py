"""Stage 7, answering with a model: loading one to answer with (load: a model folder, a Hub id or a training
checkpoint), generating with its chat template (sampling, also during training) and chatting on the
terminal (chat).

May import: loop.config, loop.data, loop.engine, loop.model, loop.state.
"""
