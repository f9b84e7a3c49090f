"""The ``lav2`` command line: ``main`` lists the commands; each command module imports the library
inside its command bodies (marked ``lazy``), so listing and ``lav2 config`` start without torch."""
