"""A cohort of slides through ``predict-slide``'s code path (``brst-train predict-cohort``).

``manifest``: the CSV of slides; ``shards``: which slides a shard runs; ``identity``: what a
slide's outputs were made from (source and model), so that a rerun skips what is done;
``publish``: a slide's folder appears complete or not at all; ``status``: per-shard JSON lines
of what happened to each slide; ``metrics``: the Prometheus counter; ``run``: one shard end to
end; ``summary`` and ``contact_sheet``: the cohort's table, AnnData and picture.
"""
