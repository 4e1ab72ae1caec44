"""The built-in end-to-end demo (``lssf-lightning demo``): see :mod:`lssf_lightning.demo.run`."""
