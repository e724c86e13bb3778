"""The embedding store: where a batch's embedding rows come from (memory, or an LRU over
Redis over the tables), and how a model's rows are laid out and published in Redis."""
