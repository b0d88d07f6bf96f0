"""Figures of the report, drawn from result tables: alignment, dissection, lesions, heads."""
