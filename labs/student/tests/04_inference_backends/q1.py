OK_FORMAT = True

test = {   'name': 'q1',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': '>>> assert isinstance(kv_cache_gb(2, 4, 2, 16, 8, 1, 16), float) and isinstance(llama3_kv_gb, float)\n>>> assert 0 < llama3_kv_gb < 100\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
