"""One module per ``hf-dspark`` command, each owning its argparse (``add_arguments``) and its ``run``.

:mod:`hf_dspark.cli` wires them together; the training commands (``prepare-data``, ``build-cache``,
``train``) live with the trainer in :mod:`hf_dspark.trainer`. A command module holds the flags, the
loop and the printing; what it computes lives in the library packages (:mod:`hf_dspark.evaluation`,
:mod:`hf_dspark.decoding`, :mod:`hf_dspark.checkpoints`).
"""
