OK_FORMAT = True

test = {   'name': 'q1',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q1', 'llmlab.memory.kv_cache_bytes'):\n"
                                               '...     assert isinstance(kv_cache_gb(2, 4, 2, 16, 8, 1, 16), float) and isinstance(llama3_kv_gb, float)\n'
                                               '...     assert 0 < llama3_kv_gb < 100 and llama3_kv_gb == kv_cache_gb(32, 32, 8, 128, 8192, 4, 16)\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
