"""Implementations behind the functional API: ``scan`` (torch backend), ``generic`` (torch.func)."""
