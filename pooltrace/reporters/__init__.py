"""Report renderers. Each takes an already computed analysis.Report and writes one format; none of them
reads the trace or the dataset."""
