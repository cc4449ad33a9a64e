"""Other projects' checkpoint layouts. So far: Nunchaku's tensor packing (``nunchaku_packing``), the first
piece of ``svdquant convert nunchaku`` (issue 14, part 3; the converter itself is not written yet)."""
