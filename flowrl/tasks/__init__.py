"""Built-in tasks that write datasets in the standard row format, with their rule rewards."""
