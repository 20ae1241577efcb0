"""Whole-slide expression maps (``brst-train predict-slide``).

A *tile* is a square of the slide on the inference grid (a row of the outputs); its *patch* is
the pixel array the model sees, cut from the tile at the model's µm/px.

``tile_grid``: lay tile centres on a grid in micrometres over the slide's tissue
(:func:`brst.handlers.tissue.slide_tissue_mask`);
``tiles``: the slide's µm/px, and the tiles' patches streamed in batches;
``predictors``: the local model; ``endpoint``: a served model (HTTP or gRPC);
``drawn_genes``: which genes to draw; ``measured``: measured counts next to the predictions;
``outputs``: the per-tile table, the AnnData file and the heatmaps;
``run``: one slide end to end.
"""
