"""Interop with the formats users already have: EAGLE-3 draft-head checkpoints
(``eagle3_checkpoint``) and verl's Parquet datasets (``verl_parquet``)."""
