"""DICOM in, DICOM out: receive (C-STORE, STOW-RS), assemble studies, write SR/SC, deliver."""
