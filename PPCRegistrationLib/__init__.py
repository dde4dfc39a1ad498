"""PPCRegistrationLib: single-view rigid 2D/3D registration of a CT to an X-ray with the Point-to-Plane
Correspondence model (classic and learned update operators).  Pure Python + torch; no Slicer, Qt or VTK."""

__version__ = "0.1.0"
