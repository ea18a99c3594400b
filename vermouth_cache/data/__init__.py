"""Datasets: which images exist, their labels, masks and sketch trees, decoded and checked, plus
the files that ship with the package (class names, templates, demo images)."""
