from emformer.train.cli import main

raise SystemExit(main())
