OK_FORMAT = True

test = {   'name': 'q1',
    'points': 1,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q1', 'llmlab.data.extract_final_answer', 'llmlab.data.verify'):\n"
                                               "...     assert extract_answer('7 plus 5 is 12.\\nAnswer: 12') == '12'\n"
                                               "...     assert extract_answer('Answer: 6 3 2') == '632'\n"
                                               "...     assert extract_answer('no answer here') is None\n",
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
