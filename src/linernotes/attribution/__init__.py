"""Attribution methods: each produces one score per training track, in the same Parquet form."""
