from moetrain.train.cli import main

raise SystemExit(main())
