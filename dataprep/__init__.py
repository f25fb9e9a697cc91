"""Data preparation: an Apache Beam pipeline from raw C4, Wikipedia and Books files to a weighted MDS mixture.

Run it with `python -m dataprep.build_mixture`; read its output with `dataprep.manifest`.
"""
