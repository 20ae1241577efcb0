"""Whole-slide expression maps (``brst-train predict-slide``).

``tissue``: find the tissue on a thumbnail and lay tile centres on a grid in micrometres;
``tiles``: cut those tiles at the model's µm/px and stream them in batches;
``predictors``: a local model or a served endpoint turning batches into expression;
``outputs``: the per-spot table, the AnnData file and the heatmaps;
``measured``: measured counts of a prepared section next to the predictions.
"""
