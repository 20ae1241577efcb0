"""Whole-slide expression maps (``brst-train predict-slide``).

``tissue``: find the tissue on a thumbnail and lay tile centres on a grid in micrometres;
``tiles``: the slide's µm/px, and tiles cut at the model's µm/px streamed in batches;
``predictors``: the local model; ``endpoint``: a served model (HTTP or gRPC);
``genes``: which genes to draw; ``measured``: measured counts next to the predictions;
``outputs``: the per-tile table, the AnnData file and the heatmaps;
``run``: one slide end to end.
"""
