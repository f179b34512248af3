"""Backdoor attacks. Each method is one module: :mod:`trojanlab.attacks.trojannet`."""
