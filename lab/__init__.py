"""sni-lab: the certificate follows the SNI, the request follows something else."""
__version__ = "0.1.0"
