"""customdiff: Multi-Concept Customization of Text-to-Image Diffusion (Kumari et al., CVPR 2023)."""

__version__ = "0.1.0"
