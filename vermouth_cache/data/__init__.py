"""Datasets: which images exist, their labels, masks and sketch trees, decoded and checked, plus
the files that ship with the package (class names, templates, demo images).

    samples     `Sample`, `Dataset` and the identity cached features hang on
    paths       the rules every loader applies: ids inside the root, symlinks that stay there
    datasets    `load_dataset`: image folders, CoOp split files, manifests (`manifests`), seg roots
    seg         segmentation layouts, label rules, masks and their crop geometry
    sbir        photo and sketch trees and the zero-shot split
    images      decoding and resizing an image for the models
    vocab, bundled   class names, templates and splits shipped in the package
    synthetic   small generated datasets of each kind, for tests and demos
"""
