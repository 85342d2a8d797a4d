"""Model code. :mod:`hf_dspark.models.dspark` is the DSpark drafter (the files that also ship as remote code)."""
