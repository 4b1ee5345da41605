"""QuPath edges: the GeoJSON reader/writer, the GeoJSON-folder source and (lazily) the paquo project source.

Importing this package must never import paquo: paquo starts QuPath's JVM at import time.
"""
