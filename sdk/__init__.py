"""emtwin's training SDK (PyTorch). It reads emtwin HDF5 datasets and needs neither Numba nor abTEM.

The SDK is built in a later issue; the dataset contract it reads is ``twin.dataset``.
"""
