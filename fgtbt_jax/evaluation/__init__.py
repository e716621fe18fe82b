"""Evaluation: flip test and heatmap decoding, NME/FR/AUC/CED, report files."""
