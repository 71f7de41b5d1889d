"""Files in and out: the checkpoint reader (index -> one block's tensors), the atomic artifact writer,
and the Hub push. No math here."""
