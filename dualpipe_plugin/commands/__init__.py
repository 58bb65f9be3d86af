"""Sub-commands of the ``dualpipe-plugin`` CLI, one module each (``add_arguments`` + ``run``)."""
