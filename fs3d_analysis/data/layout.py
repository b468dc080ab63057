"""Re-export of :mod:`fs3d_accel.layout`: one Layout type for the pipeline's outputs and the data's
ground truth."""
from fs3d_accel.layout import Layout, matrix_to_quaternion, quaternion_to_matrix

__all__ = ["Layout", "quaternion_to_matrix", "matrix_to_quaternion"]
